"""What the tests share: tiny random-weight GGUF files (tiny_gguf), also usable by anyone who wants
a model file in a few kilobytes. Not imported by the rest of the package."""
