"""ClientApp of household-digits: every device of every household runs this."""

from homesplit.clients import device_app

from household_digits.task import build_model, example_inputs, load_data

app = device_app(model_fn=build_model, example_inputs=example_inputs, load_data=load_data, loss="cross_entropy")
