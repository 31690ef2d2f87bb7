"""python -m runtime.probe [--url URL]: the probe's command line is cli/probe.py, its work bench/probe.py."""
from cli.probe import main

if __name__ == "__main__":
    main()
