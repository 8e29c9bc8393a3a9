"""Command-line interfaces of fa_vae (argument parsing; scripts/ holds thin shims)."""
