"""python -m runtime.serve [overrides], and Serve's application builder `runtime.serve:ray_app`:
the serve entry point is cli/serve.py."""
from cli.serve import main, ray_app  # noqa: F401

if __name__ == "__main__":
    main()
