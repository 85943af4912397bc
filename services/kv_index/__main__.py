from services.kv_index.service import main

main()
