"""Small helpers that every part may use (asyncio, files). Imports nothing else of the project."""
