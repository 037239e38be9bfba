"""Settings, checked before any work starts and without torch: the run's schema, every setting
declared once with its help (`schema`), the typed specs passed to each part (`specs`), and
settings as text for the command line and Flower's run config (`text`)."""
