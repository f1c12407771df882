"""``python -m diffgpu ...``: the same as the ``diffgpu`` command."""

from .cli import main_exit

main_exit()
