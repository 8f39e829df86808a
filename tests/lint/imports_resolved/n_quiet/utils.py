def publish(t):
    print(t)
