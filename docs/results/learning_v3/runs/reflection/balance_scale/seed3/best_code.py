# best reward 0.958297 at environment step 41
import numpy as np


def build_model(x_train: np.ndarray, y_train: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    clf = LogisticRegression()
    clf.fit(x_train, y_train)
    return clf

