"""Small pieces every part of the project uses: configs, checkpoints, errors."""
