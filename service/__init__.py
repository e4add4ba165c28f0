"""allot's HTTP front end: the aiohttp application, its handlers and the ``allot`` CLI."""
