"""The web playground's static files: index.html, app.js, style.css (no build step, shipped as package data);
served at / by serving/http/routes_playground.py."""
