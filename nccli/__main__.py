"""``python -m nccli``."""

from nccli.cli import main

if __name__ == "__main__":
    main()
