"""`python -m mmexport ...` == `mmexport ...`."""
from .cli import main

main()
