"""python -m selfextend_gguf: the selfextend-gguf command."""
import sys

from .cli import main

sys.exit(main())
