"""`python -m id_animator.train <command>`; also what `accelerate launch -m id_animator.train` runs."""
import sys

from .cli import main

sys.exit(main())
