"""Loading a model (`loading`), its checkpoint's files (`checkpoint`) and one adapter per model
family (`families`)."""
