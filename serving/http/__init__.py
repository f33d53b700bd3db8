"""The ingress's HTTP layer: the FastAPI app factory (app.py) and one APIRouter per route group.

Routes reach the running ingress through `request.app.state.ingress` (set by the factory) and never import the
deployment module; errors, auth and health live in their own modules. Nothing here mutates a module-level app.
"""
