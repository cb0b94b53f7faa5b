"""Deployment files for a plan (`r1deploy plan --emit FORMAT --out DIR`): spec.py reads the plan once, one
module per format writes its files (docker, compose, k8s, systemd, slurm), templates/ holds the text ones."""
