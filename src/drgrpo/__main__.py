"""``python -m drgrpo`` (and ``torchrun -m drgrpo``): the ``drgrpo`` command line."""

from drgrpo.train.cli.main import main

raise SystemExit(main())
