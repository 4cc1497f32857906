"""Switchyard, an OpenAI-compatible LLM gateway on Kafka: the one package everything installs under.

- `switchyard.services.<ingress|router|workers|accounting>`: the four services (the folder `services/`);
- `switchyard.shared`: the library they share (the folder `shared/`);
- `switchyard.cli`, `switchyard.devstack`, `switchyard.batch`: the tools that run the services and talk to a
  running stack; they sit above the services, and nothing below imports them (`lint-imports` checks it).

`services` and `shared` here are links to the folders at the repository root, which keep their place.
"""
