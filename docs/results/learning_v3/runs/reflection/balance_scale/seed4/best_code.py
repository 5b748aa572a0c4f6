# best reward 0.961376 at environment step 25
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    classifier = LogisticRegression()
    classifier.fit(x_train, y_train)
    classifier.fit(x_train, y_train)
    return classifier

