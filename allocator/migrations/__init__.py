"""SQL migrations, applied in file-name order by ``allot migrate`` (see allocator/db.py)."""
