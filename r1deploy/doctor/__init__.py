"""`r1deploy doctor`: inspect this host (host.py, gpu_probe.py) and check it against a deployment plan
(requirements.py, checks.py), printed by report.py; cli.py wires the subcommand."""
