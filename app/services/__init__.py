"""Domain services: what the routes do, apart from HTTP."""
