"""Thin launcher: `python cli.py ...` behaves exactly as `mmexport ...`."""
from mmexport.cli import main

if __name__ == "__main__":
    main()
