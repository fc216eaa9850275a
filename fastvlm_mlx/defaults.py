"""User-facing defaults, in a module light enough for the CLI to import before any model code."""

DEFAULT_MODEL = "apple/FastVLM-0.5B"
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_PIXELS = 200_000_000  # a 200 MP photo decodes to 600 MB of RGB
DEFAULT_CAPTION_PROMPT = "Describe the image in one or two sentences."
