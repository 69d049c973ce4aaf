"""Model preparation and checks: download and quantize the served model, check the served engine against a reference."""
