"""python -m pipeline {export,calibrate,bench,compare} [overrides]: the commands are cli/pipeline.py's."""
from cli.pipeline import main

if __name__ == "__main__":
    main()
