"""The part the trainer and the service share: network maths, preprocessing, model format."""
