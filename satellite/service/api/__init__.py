"""HTTP API v1 of `satellite serve`: one thin router per resource (parse, call, render)."""
