using System.Buffers.Binary;
using System.Text;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Fuzz;

/// <summary>
/// Small valid inputs for every target, generated (no weights or tokenizers are copied): the seed corpus that
/// scripts/fuzz.sh starts AFL++ from, and the fixed companion files of the workspace. A model of 8 dimensions, one layer
/// and 8 tokens keeps every file a few kilobytes, which AFL++ mutates quickly.
/// </summary>
public static class Seeds
{
    public static readonly LlamaConfig Tiny = new()
    {
        Dim = 8, HiddenDim = 16, Layers = 1, Heads = 2, KvHeads = 1, HeadDim = 4, VocabSize = 8, MaxSeqLen = 4,
        RmsNormEps = 1e-5f, RopeTheta = 10000f, RopeLayout = RopeLayout.HalfSplit,
    };

    /// <summary>Writes the seed corpus: &lt;directory&gt;/&lt;target&gt;/&lt;seed&gt;.</summary>
    public static void WriteCorpus(string directory)
    {
        void Seed(string target, string name, byte[] bytes)
        {
            Directory.CreateDirectory(Path.Combine(directory, target));
            File.WriteAllBytes(Path.Combine(directory, target, name), bytes);
        }
        using var scratch = new ScratchDirectory();

        Seed("llama2c", "v0-tied.bin", Llama2c(version: 0, shared: true));
        Seed("llama2c", "v0-untied.bin", Llama2c(version: 0, shared: false));
        Seed("llama2c", "v1-tied.bin", Llama2c(version: 1, shared: true));

        foreach (var dtype in new[] { DType.F32, DType.F16, DType.BF16 })
        {
            string hf = scratch.PathOf("hf-" + dtype.Name());
            SyntheticModel.Write(Tiny, hf, dtype);
            Seed("safetensors", $"{dtype.Name()}.safetensors", File.ReadAllBytes(Path.Combine(hf, "model.safetensors")));
        }
        Seed("hf-config", "config.json", Encoding.UTF8.GetBytes(HuggingFaceExport.ConfigJson(Tiny, DType.F32).ToJsonString()));
        Seed("hf-config", "config-ids.json", Encoding.UTF8.GetBytes(
            """{"architectures":["MistralForCausalLM"],"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"vocab_size":8,"bos_token_id":[1],"eos_token_id":[2,3],"tie_word_embeddings":true,"rope_theta":500000.0,"rms_norm_eps":1e-06}"""));

        WriteSharded(scratch.PathOf("sharded"));
        Seed("hf-index", "model.safetensors.index.json", File.ReadAllBytes(scratch.PathOf("sharded/model.safetensors.index.json")));

        WriteAnyPrecision(scratch.PathOf("ap"));
        Seed("ap-config", "config.json", File.ReadAllBytes(scratch.PathOf("ap/config.json")));
        Seed("ap-safetensors", "model.safetensors", File.ReadAllBytes(scratch.PathOf("ap/model.safetensors")));

        Seed("tokenizer", "bpe-bytes.model", SentencePieceModel(byteFallback: true));
        Seed("tokenizer", "bpe.model", SentencePieceModel(byteFallback: false));

        Seed("score-jsonl", "rows.jsonl", Encoding.UTF8.GetBytes(
            "{\"text\": \"Once upon a time\"}\n{\"text\": null, \"id\": 2}\n\n{\"text\": \"\\u00e9\\ud83d\\ude42 tab\\t\\\"q\\\"\"}\r\n[1]\n{\"id\": 5}\n{\"text\": 7}\n{\"text\": \"" + new string('x', 80) + "\"}\n"));
        Seed("score-csv", "rows.csv", Encoding.UTF8.GetBytes(
            "id,text\n1,Once upon a time\n2,\"quoted, with \"\"quotes\"\"\nand a newline\"\n3\n4,\r\n5," + new string('y', 80) + "\n"));
    }

    /// <summary>A llama2.c checkpoint of <see cref="Tiny"/>: a version 0 (28-byte) or version 1 (256-byte, "ak42") header, then fp32 data.</summary>
    public static byte[] Llama2c(int version, bool shared)
    {
        var c = Tiny;
        long floats = (long)c.VocabSize * c.Dim * (shared ? 1 : 2) + c.Dim
            + c.Layers * (2L * c.Dim + 2L * c.Dim * c.QDim + 2L * c.Dim * c.KvDim + 3L * c.Dim * c.HiddenDim)
            + (version == 0 ? 2L * c.MaxSeqLen * (c.HeadDim / 2) : 0);
        int header = version == 0 ? 28 : 256;
        var bytes = new byte[header + 4 * floats];
        int[] h = [c.Dim, c.HiddenDim, c.Layers, c.Heads, c.KvHeads, shared ? c.VocabSize : -c.VocabSize, c.MaxSeqLen];
        int at = 0;
        if (version == 1)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(bytes, 0x616b3432);
            BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(4), 1);
            h[5] = c.VocabSize;
            bytes[36] = shared ? (byte)1 : (byte)0;
            at = 8;
        }
        foreach (int v in h) { BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(at), v); at += 4; }
        for (long i = 0; i < floats; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan((int)(header + 4 * i)), 0.01f * ((i * 7 % 13) - 6));
        return bytes;
    }

    /// <summary>A Hugging Face directory of <see cref="Tiny"/> (config.json and one fp32 model.safetensors).</summary>
    public static void WriteHuggingFace(string directory) => SyntheticModel.Write(Tiny, directory, DType.F32, overwrite: true);

    /// <summary>The same model split into shards (an index and several safetensors files).</summary>
    public static void WriteSharded(string directory)
    {
        using var scratch = new ScratchDirectory();
        WriteHuggingFace(scratch.PathOf("hf"));
        using var source = LlamaCheckpoint.Open(scratch.PathOf("hf"));
        HuggingFaceExport.Write(source, directory, maxShardBytes: 1024, overwrite: true);
    }

    /// <summary>An any-precision directory of <see cref="Tiny"/> at widths 2..3.</summary>
    public static void WriteAnyPrecision(string directory)
    {
        using var scratch = new ScratchDirectory();
        WriteHuggingFace(scratch.PathOf("hf"));
        using var source = LlamaCheckpoint.Open(scratch.PathOf("hf"));
        AnyPrecisionQuantizer.Quantize(source, directory, new UniformSensitivity(), new QuantizerOptions { SeedBits = 2, ParentBits = 3, MaxDegreeOfParallelism = 1 }, overwrite: true);
    }

    /// <summary>
    /// A SentencePiece BPE model (the protobuf of sentencepiece_model.proto, written field by field): &lt;unk&gt;, &lt;s&gt;,
    /// &lt;/s&gt;, optionally the 256 byte pieces, then a few merges of "▁", letters and words.
    /// </summary>
    public static byte[] SentencePieceModel(bool byteFallback)
    {
        var model = new ProtoWriter();
        void Piece(string text, float score, int type)
        {
            var p = new ProtoWriter();
            p.String(1, text);
            p.Float(2, score);
            p.Varint(3, type);
            model.Message(1, p);
        }
        Piece("<unk>", 0, 2);
        Piece("<s>", 0, 3);
        Piece("</s>", 0, 3);
        if (byteFallback) for (int b = 0; b < 256; b++) Piece($"<0x{b:X2}>", 0, 6);
        string[] normal = ["▁", "e", "t", "a", "o", "n", "i", "m", "▁t", "he", "▁the", "▁a", "on", "ce", "▁Once", "up", "▁upon", "▁time", ",", "."];
        for (int i = 0; i < normal.Length; i++) Piece(normal[i], -i, 1);

        var trainer = new ProtoWriter();
        trainer.Varint(3, 2); // model_type: BPE
        trainer.Varint(4, model.Count);
        if (byteFallback) trainer.Varint(35, 1);
        trainer.Varint(40, 0); // unk_id
        trainer.Varint(41, 1); // bos_id
        trainer.Varint(42, 2); // eos_id
        trainer.Varint(43, -1); // pad_id
        model.Message(2, trainer);

        var normalizer = new ProtoWriter();
        normalizer.String(1, "identity");
        normalizer.Varint(3, 1); // add_dummy_prefix
        normalizer.Varint(4, 0); // remove_extra_whitespaces
        normalizer.Varint(5, 1); // escape_whitespaces
        model.Message(3, normalizer);
        return model.ToArray();
    }

    /// <summary>Just enough of the protobuf wire format for the model above.</summary>
    private sealed class ProtoWriter
    {
        private readonly MemoryStream _bytes = new();
        public int Count { get; private set; }

        private void Raw(ulong v)
        {
            while (v >= 0x80) { _bytes.WriteByte((byte)(v | 0x80)); v >>= 7; }
            _bytes.WriteByte((byte)v);
        }
        private void Tag(int field, int wire) => Raw((ulong)(field << 3 | wire));
        public void Varint(int field, long v) { Tag(field, 0); Raw((ulong)v); }
        public void Float(int field, float v) { Tag(field, 5); Span<byte> b = stackalloc byte[4]; BinaryPrimitives.WriteSingleLittleEndian(b, v); _bytes.Write(b); }
        public void Bytes(int field, byte[] v) { Tag(field, 2); Raw((ulong)v.Length); _bytes.Write(v); }
        public void String(int field, string v) => Bytes(field, Encoding.UTF8.GetBytes(v));
        public void Message(int field, ProtoWriter m) { Bytes(field, m.ToArray()); if (field == 1) Count++; }
        public byte[] ToArray() => _bytes.ToArray();
    }

    private sealed class ScratchDirectory : IDisposable
    {
        private readonly string _root = Directory.CreateDirectory(Path.Combine(Path.GetTempPath(), "anyprec-seeds-" + Guid.NewGuid().ToString("N"))).FullName;
        public string PathOf(string relative) => Path.Combine(_root, relative);
        public void Dispose() { try { Directory.Delete(_root, recursive: true); } catch (IOException) { } }
    }
}
