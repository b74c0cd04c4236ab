"""Sans-IO protocol engines: bytes in, replies and events out; no sockets, files or asyncio."""
