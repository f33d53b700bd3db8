"""The web playground: static index.html / app.js / style.css (no build step) and its routes (routes.py)."""
