"""Pure converters between our parameter tree and the official and Hugging Face layouts."""
