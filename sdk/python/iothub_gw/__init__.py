"""iothub_gw: the iot-hub gateway SDK for Python (asyncio). docs/sdk.md."""

from .gateway import Command, Gateway, reading_message
from .spool import Spool, SpoolFull

__all__ = ["Gateway", "Command", "Spool", "SpoolFull", "reading_message"]
__version__ = "1.0.0"
