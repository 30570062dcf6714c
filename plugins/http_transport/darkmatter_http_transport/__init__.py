"""The DarkMatter mesh protocol over HTTP: mesh routes and the HTTP transport."""
