"""The game client: play a world model with WASD and mouse, record, replay, export.

``python -m play --help`` lists the options; ``play/default_controls.toml`` the controls.
"""
