"""iothub_gw: the iot-hub gateway SDK for Python (asyncio). docs/sdk.md."""

from .gateway import Command, Gateway
from .spool import Spool, SpoolFull

__all__ = ["Gateway", "Command", "Spool", "SpoolFull"]
__version__ = "1.0.0"
