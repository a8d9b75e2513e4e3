"""Thin adapters onto engines users already run (optional extras).

- `kerasdist.integrations.ray`: Ray Train (`pip install kerasdist[ray]`).
- `kerasdist.integrations.flower`: federated averaging on Flower
  (`pip install kerasdist[federated]`).

Each is imported on its own, so kerasdist does not need the engine.
"""

__all__: list[str] = []
