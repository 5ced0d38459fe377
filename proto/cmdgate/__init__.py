"""cmdgate: run approved commands on many hosts through a double gate.

The distribution installs under this one namespace:

- ``cmdgate.v1``: code generated from ``proto/cmdgate/v1/*.proto``;
- ``cmdgate.shared``: the little that the agent and the client both need
  (key files, JWKS, lab token minting, the wire constants);
- ``cmdgate.agent``: the daemon;
- ``cmdgate.client``: the CLI and the Python API.
"""

__version__ = "0.1.0"
