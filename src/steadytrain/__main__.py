"""``python -m steadytrain`` (how ``--nproc`` starts its workers)."""

from steadytrain.cli.app import main

if __name__ == "__main__":
    main()
