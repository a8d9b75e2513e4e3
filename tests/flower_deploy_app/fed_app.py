"""The Flower App of test_flower_deployment.py: kerasdist's ClientApp and
ServerApp for the flower_app model, 2 SuperNodes, FedAvg, 2 rounds. The
ServerApp writes the server-side metrics of every round to $KD_FLOWER_OUT.
"""

import json
import os

import flower_app
from flwr.serverapp.strategy import FedAvg

from kerasdist.integrations import flower as kdf


def _save(result):
    metrics = result.evaluate_metrics_serverapp
    with open(os.environ["KD_FLOWER_OUT"], "w") as f:
        json.dump({str(r): dict(metrics[r]) for r in metrics}, f)


strategy = FedAvg(min_available_nodes=2, min_train_nodes=2,
                  min_evaluate_nodes=2)
server = kdf.server_app(flower_app.model_fn, strategy, num_rounds=2,
                        evaluate_data=flower_app.TEST_DATA,
                        train_config={"epochs": 2}, on_result=_save)
client = kdf.client_app(flower_app.model_fn, flower_app.data_fn)
