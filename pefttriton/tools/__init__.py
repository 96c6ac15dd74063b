"""Tools beside the package: the ahead-of-time kernel report and the analysis of learned updates."""
