"""`python -m tests.fake_comfyui --port N`: see main.py."""

from .main import main

raise SystemExit(main())
