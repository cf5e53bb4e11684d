"""``python -m moe_parallel.train`` (and ``torchrun ... -m moe_parallel.train``): the main job."""

from .job import main

if __name__ == "__main__":
    main()
