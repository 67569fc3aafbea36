"""Operations scripts run from the repository root (``python -m scripts.<name>``): not
part of the ``emonet`` library, and never imported by it."""
