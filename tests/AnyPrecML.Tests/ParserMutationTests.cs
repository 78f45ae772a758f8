using System.Text;
using AnyPrecML.Cli;
using AnyPrecML.MLNet.Scoring;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

/// <summary>
/// Mutated inputs for every parser (seeded, so each case replays): a parser either accepts the input or rejects it
/// with its format exception; nothing else escapes (no overflow, null reference, index or conversion exception).
/// Not coverage-guided fuzzing (see docs/RELIABILITY.md), but it holds the line on the crash classes issue 14 found.
/// </summary>
[TestClass]
public sealed class ParserMutationTests
{
    private const int Cases = 300;

    private static void Mutate(byte[] bytes, int start, int end, Random rng)
    {
        int edits = 1 + rng.Next(4);
        for (int e = 0; e < edits; e++)
        {
            int at = start + rng.Next(end - start);
            bytes[at] = rng.Next(4) switch
            {
                0 => (byte)rng.Next(256),
                1 => (byte)(bytes[at] ^ (1 << rng.Next(8))),
                2 => 0xFF,
                _ => 0x80,
            };
        }
    }

    private static void AcceptOrReject(Action open, string what)
    {
        try { open(); }
        catch (ModelFormatException) { }
        catch (Exception e) { Assert.Fail($"{what}: {e.GetType().Name} escaped: {e.Message}"); }
    }

    [TestMethod]
    public void MutatedLlama2cHeadersAreAcceptedOrRejectedAsFormatErrors()
    {
        using var dir = TestData.NewTempDir();
        var original = File.ReadAllBytes(TestData.Stories260K);
        for (int seed = 0; seed < Cases; seed++)
        {
            var bytes = (byte[])original.Clone();
            var rng = new Random(seed);
            Mutate(bytes, 0, 28, rng);
            if (seed % 4 == 0) bytes = bytes[..rng.Next(1, bytes.Length)];
            File.WriteAllBytes(dir["m.bin"], bytes);
            AcceptOrReject(() => LlamaCheckpoint.Open(dir["m.bin"]).Dispose(), $"llama2.c seed {seed}");
        }
    }

    [TestMethod]
    public void MutatedSafetensorsHeadersAreAcceptedOrRejectedAsFormatErrors()
    {
        using var dir = TestData.NewTempDir();
        CheckpointTests.WriteHuggingFace(TestData.RandomWeights(TestData.TinyConfig(), seed: 2), dir["hf"]);
        string st = dir["hf/model.safetensors"];
        var original = File.ReadAllBytes(st);
        int headerEnd = 8 + (int)BitConverter.ToUInt64(original, 0);
        for (int seed = 0; seed < Cases; seed++)
        {
            var bytes = (byte[])original.Clone();
            var rng = new Random(seed);
            Mutate(bytes, 0, headerEnd, rng);
            File.WriteAllBytes(st, bytes);
            AcceptOrReject(() => LlamaCheckpoint.Open(dir["hf"]).Dispose(), $"safetensors seed {seed}");
        }
    }

    private static readonly string[] JsonPieces = ["{", "}", "[", "]", "\"", ",", ":", "null", "true", "-1", "1e400", "2147483648", "0", "[null]", "\"x\"", "{}", "\"\\udc00\"", ""];

    private static string MutateJson(string json, Random rng)
    {
        var sb = new StringBuilder(json);
        int edits = 1 + rng.Next(3);
        for (int e = 0; e < edits; e++)
        {
            int at = rng.Next(sb.Length), len = Math.Min(sb.Length - at, rng.Next(6));
            sb.Remove(at, len).Insert(at, JsonPieces[rng.Next(JsonPieces.Length)]);
        }
        return sb.ToString();
    }

    [TestMethod]
    public void MutatedConfigJsonIsAcceptedOrRejectedAsAFormatError()
    {
        using var dir = TestData.NewTempDir();
        CheckpointTests.WriteHuggingFace(TestData.RandomWeights(TestData.TinyConfig(), seed: 2), dir["hf"]);
        string cfg = dir["hf/config.json"];
        string original = File.ReadAllText(cfg);
        for (int seed = 0; seed < Cases; seed++)
        {
            File.WriteAllText(cfg, MutateJson(original, new Random(seed)));
            AcceptOrReject(() => LlamaCheckpoint.ReadHuggingFaceConfig(cfg), $"config.json seed {seed}");
        }
    }

    [TestMethod]
    public void MutatedAnyPrecisionSectionsAreAcceptedOrRejectedAsFormatErrors()
    {
        using var dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(dir["ap"], new QuantizerOptions { SeedBits = 2, ParentBits = 3 });
        string cfg = dir["ap/config.json"];
        string original = File.ReadAllText(cfg);
        int section = original.IndexOf("\"anyprecision\"", StringComparison.Ordinal);
        for (int seed = 0; seed < Cases / 2; seed++)
        {
            var rng = new Random(seed);
            string mutated = original[..section] + MutateJson(original[section..(section + 200)], rng) + original[(section + 200)..];
            File.WriteAllText(cfg, mutated);
            AcceptOrReject(() => AnyPrecisionModel.Open(dir["ap"]).Dispose(), $"anyprecision section seed {seed}");
        }
    }

    [TestMethod]
    public void MutatedScoreInputsGiveARecordOrAProblemForEveryLine()
    {
        using var dir = TestData.NewTempDir();
        var lines = File.ReadLines(TestData.TinyStories).Take(4).Select(t => System.Text.Json.JsonSerializer.Serialize(new { text = t[..Math.Min(80, t.Length)] })).ToArray();
        var original = Encoding.UTF8.GetBytes(string.Join('\n', lines) + "\n");
        var csv = Encoding.UTF8.GetBytes("id,text\n" + string.Join('\n', lines.Select((l, i) => $"{i},\"{l.Replace("\"", "\"\"")}\"")) + "\n");
        var limits = new RowLimits(100, Reject: false, MaxBytes: 150);
        File.WriteAllBytes(dir["bad-text.jsonl"], [.. "{\"text\": \"\\udc00\"}\n{\"text\": \""u8, 0xC3, 0x28, .. "\"}\n"u8]);
        var bad = ScoreInput.Read(dir["bad-text.jsonl"], "text", limits).ToList();
        Assert.HasCount(2, bad);
        Assert.IsTrue(bad.All(r => r.Problem is not null || r.Text is not null), "a lone surrogate escape and invalid UTF-8 give a record each");
        Assert.AreEqual("the text is not valid UTF-8 or holds a lone surrogate escape", bad[1].Problem);
        for (int seed = 0; seed < Cases; seed++)
        {
            var rng = new Random(seed);
            var jsonl = (byte[])original.Clone();
            Mutate(jsonl, 0, jsonl.Length, rng);
            File.WriteAllBytes(dir["m.jsonl"], jsonl);
            var records = ScoreInput.Read(dir["m.jsonl"], "text", limits).ToList();
            Assert.IsTrue(records.All(r => (r.Text is null) != (r.Problem is null)), $"jsonl seed {seed}: each record has a text or a problem");
            Assert.IsTrue(records.All(r => r.Text is null || r.Text.Length <= limits.MaxChars), $"jsonl seed {seed}: texts are cut to the limit");

            var delimited = (byte[])csv.Clone();
            Mutate(delimited, 8, delimited.Length, rng); // the header stays: a damaged header is a whole-file error
            File.WriteAllBytes(dir["m.csv"], delimited);
            try
            {
                var rows = ScoreInput.Read(dir["m.csv"], "text", limits).ToList();
                Assert.IsTrue(rows.All(r => (r.Text is null) != (r.Problem is null)), $"csv seed {seed}");
            }
            catch (FormatException) { } // the mutation reached the header's column name
        }
    }
}
