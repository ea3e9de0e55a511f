"""Training of the bundled model on synthetic scenes; never imported by the app."""
