"""The release format and the read-only filesystem.

Publishing turns a directory tree into content-addressed objects and an SQLite
catalog whose hash is signed as a TUF target.  The node side keeps a bounded
local object cache and serves a FUSE mount that fetches missing objects from an
injected :class:`cvmfs_like.objects.ObjectSource` and verifies every object
against its SHA-256 name before any byte reaches a reader.

This package never imports libtorrent or aiohttp.
"""
