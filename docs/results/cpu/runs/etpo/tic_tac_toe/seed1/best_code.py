# best reward -1.000000 at environment step 1

    from sklearn.ensemble import l1_regularizer
    from sklearn.model_selection import train_test_split
    from keras.layers import Dense, LSTM, LSTMLinear
    from keras.layers import GRU, GRUB, LSTMLinear
    from keras.layers import Dropout
    from keras.layers import Conv2D, MaxTranspose2D, LSTMLinear
    from keras.layers import Dense
    from keras.layers import Flatten
