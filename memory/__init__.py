"""The visual memory: sharded indices on disk or GCS, fan-out search, voting, classification."""
from memory.manifest import MemoryFormatError
from memory.memory import Classification, Memory, Neighbours, write_memory

__all__ = ["Classification", "Memory", "MemoryFormatError", "Neighbours", "write_memory"]
